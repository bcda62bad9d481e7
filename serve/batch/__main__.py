"""`python -m serve.batch`: see `serve/batch/job.py`."""
import sys

from serve.batch.job import main

sys.exit(main())

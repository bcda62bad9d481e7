"""Offline batch generation on Ray Data (`python -m serve.batch`): the job (`job.py`), its Ray Data
pipeline (`data.py`), one input line's parsing and run (`lines.py`), and the pool watcher that logs
scaling while it runs (`watch.py`)."""

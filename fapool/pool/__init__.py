"""The pool's Ray-free data plane: the base's pooled executor, the members' shard server, the
wire protocol and transport (torch.distributed), shard placement and membership epochs.

The Ray shells in `actors/` create the processes and carry membership changes; everything that
runs per step lives here, so it can be tested over gloo without Ray (`tests/unit/test_pool_gloo.py`).
"""

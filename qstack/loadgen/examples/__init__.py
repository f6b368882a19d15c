"""Example scripts for `qstack load --script` (see docs/LOAD.md)."""

"""Tools around the engine, each behind an `es-mpi` command: the benchmark (`bench`),
scaling measurements (`bench --scaling`), reports with plots (`report`) and the memory
planner (`plan`). A training run never needs them: the engine (the modules of es_mpi
itself) never imports this package, which tests/test_layout.py checks from the imports.
"""

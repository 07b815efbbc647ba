"""es-mpi: full-parameter Evolution Strategies fine-tuning of LLMs on MPI."""

__version__ = "0.1.0"

"""dify-batch: run Dify apps over tables of data, concurrently and resumably."""

__version__ = "0.1.0"

"""JSON Schema files of the records of every topic (read by :mod:`trendcast.contract`)."""

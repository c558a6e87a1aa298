"""The running worker: the Faust app, its batch consumer, the runner of ``trendcast worker``."""

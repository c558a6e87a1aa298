"""The running worker: the Faust app, its batch consumer, the runner behind ``trendcast worker``."""

"""What the worker tells operators and observers: metrics, health, online accuracy, trends."""

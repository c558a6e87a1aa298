"""One batch of sale events: validate, bucket by event time, store, close buckets, forecast."""

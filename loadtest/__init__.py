"""Load testing: synthetic firehose, Jetstream-protocol replay server, phase replays, benchmarks."""

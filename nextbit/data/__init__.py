"""Stage 1a: turn raw text or code into token shards (`nextbit prepare`)."""

"""NPR-Engine: parallel decoding with fork and join over a shared, refcounted KV store."""

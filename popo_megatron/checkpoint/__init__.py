"""popo checkpoints on disk: the directory format, model and twin weights in it, training state, and a
run's checkpoints (the newest, what a resumed run changes)."""

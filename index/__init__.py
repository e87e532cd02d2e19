"""The similarity index: FAISS and numpy, no Ray (see store.open_index)."""

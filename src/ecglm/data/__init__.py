"""ECG datasets: builders that write WebDataset shards, and the readers that load them."""

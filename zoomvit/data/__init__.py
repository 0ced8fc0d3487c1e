"""Data: WebDataset reading, robust decoding, the demo-dataset generator and the relevance store."""

"""Datasets in, tokenized examples out: read files into rows (tables), decide what each column is and render a
row with its loss spans (formats), tokenize, split, pack and collate (dataset)."""

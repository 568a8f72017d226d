"""Datasets in, tokenized examples out, as a forward pipeline (dataset.prepare): read files and hub datasets into
rows (tables, hub), decide what each column is and render a row with its loss spans (formats), tokenize in batches
(encoding), fit rows to max_length as windows or cuts, split and pack on numpy arrays (examples), and keep the
result for the next run (cache). spec holds the data settings, epochs the steps an epoch is."""

"""Images and labels for a trial: dataset loaders by name, the decoded-image cache, leak-free splits, leak checks,
class-balanced sampling and normalisation. Start at `datasets.load_dataset`."""

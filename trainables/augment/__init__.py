"""More training images: per-sample torchvision v2 transforms (`per_sample`), the same on whole batches with Kornia
on the trial's device (`batched`), and generated minority images from a class-conditional DCGAN (`synthetic`, `dcgan`)."""

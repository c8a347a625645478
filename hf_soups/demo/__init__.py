"""The offline demo: real MNIST digits, a tiny CLIP pre-trained from scratch, and a sweep of
fine-tuned ingredients to make soups from."""

"""Model files and the model seam: families and configs, checkpoint reading/writing and key maps, the Backend protocol and its diffusers implementation, sampling."""

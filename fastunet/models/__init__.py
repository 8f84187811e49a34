"""The fastunet UNet models."""

"""DPO training of AlignXpert-ICA and -PBA on Ray Train (paper §5)."""

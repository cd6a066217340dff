"""AlignX: personalized preference alignment over a shared preference space."""

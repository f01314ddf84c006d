"""Readers that turn DICOM, NIfTI and image folders into ichseg types."""

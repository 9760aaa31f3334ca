"""Built-in data formats: CSV manifests, image folders, MedMNIST, DICOM, phantoms."""

"""The backend written in the csi-kit tutorial ("Your first backend")."""

"""The local world: guests are processes whose RAM is a memfd the host maps (edge code)."""

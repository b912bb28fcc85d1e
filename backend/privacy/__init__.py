"""Data protection: retention with periodic purges, erasure of users and tenants, exports."""

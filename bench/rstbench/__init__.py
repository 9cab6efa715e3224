"""rsttrace's benchmark (bench/run): see bench/README.md."""

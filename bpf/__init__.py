# Lets the C sources in this directory ship inside the wheel as the package data rsttrace.bpf
# (pyproject.toml maps rsttrace.bpf to bpf/); there is no Python here.

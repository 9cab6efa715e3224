"""From kernel facts to running BPF programs: the generated C, bcc, the tracer, the record contract."""

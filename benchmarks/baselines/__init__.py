"""The baseline arms' training loops (plain DDP, torchrun, torchft), each run as a module by a benchmark."""

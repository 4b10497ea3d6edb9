"""torch.distributed for every method: process groups and device choice (`processes`), FSDP2 sharding (`fsdp`)."""

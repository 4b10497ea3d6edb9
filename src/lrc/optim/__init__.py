"""The learning rate: `--lr auto`'s rule and the warm-up/decay schedule."""

"""The network: architecture tables, layers, blocks, the MixNet module, and inference-time fusion.

Nothing here reads files or knows where weights come from (that is ``mixnet.pretrained``)."""

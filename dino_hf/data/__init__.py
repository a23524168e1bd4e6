"""Images in: ``datasets`` streaming with node/worker sharding and exact resumption, the one image
decoder, the multi-crop (per image in the loader, or batched on a device) and the iBOT masks.

Imports: the base modules only.
"""

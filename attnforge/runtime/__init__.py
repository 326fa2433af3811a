"""Runtime: cache, loader, launch, autograd, reference. Imports dsl and codegen."""

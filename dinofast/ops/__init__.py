"""One module per op: registration with torch.library, backend dispatch, autograd, functional API."""

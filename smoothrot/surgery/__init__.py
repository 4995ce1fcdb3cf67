"""Model surgery: fold and unfold scales, fuse rotations, online hooks, the residual rotation."""

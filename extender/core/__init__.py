"""The pure decision core: chains, policy, snapshot in; decisions out. Imports nothing that does I/O."""

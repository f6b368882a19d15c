"""Example apps that ship with the package: ``qstack serve qstack.apps.echo:handle``.

(A source checkout also has them as ``apps.*``; those re-export these.)
"""

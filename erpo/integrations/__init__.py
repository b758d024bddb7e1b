"""Drop-ins for the engines people train with: `erpo.integrations.trl` (TRL's GRPOTrainer with erpo's loss) and
`erpo.integrations.verl` (erpo's losses in verl's policy-loss registry). Each imports its engine, so import the
submodule you use; nothing here is imported by `import erpo`."""

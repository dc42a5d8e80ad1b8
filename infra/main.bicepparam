using './main.bicep'

param namePrefix = 'evtproxy'

// Secrets and per-user values come from the environment or from `-p name=value` on the
// command line; the CLI can override only parameters this file sets, hence the empty
// defaults. An empty organizer key fails the template's @minLength(16) check on purpose.
param organizerKey = readEnvironmentVariable('ORGANIZER_KEY', '')
param deployerPrincipalId = readEnvironmentVariable('DEPLOYER_PRINCIPAL_ID', '')

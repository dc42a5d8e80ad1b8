using './main.bicep'

param namePrefix = 'evtproxy'

// What events allow, by deployment name (events name deployments, not models). Each
// deployment picks its own SKU. The version is what a hand-run 'az deployment group create'
// deploys; 'make deploy' (devtools/deploy/command.py) asks the region (az cognitiveservices model list
// -l REGION) and deploys the newest generally available version of each model that still takes
// new deployments on the event's last day, or stops and names what the region offers instead.
// gpt-5.4 2026-03-05 (new customers until 2027-03-05) and text-embedding-3-small 1 are both
// offered as GlobalStandard in eastus2, the deploy guide's example region.
param modelDeployments = [
  {
    name: 'gpt-5.4'
    model: 'gpt-5.4'
    version: '2026-03-05'
    skuName: 'GlobalStandard'
    capacity: 50
  }
  {
    name: 'text-embedding-3-small'
    model: 'text-embedding-3-small'
    version: '1'
    skuName: 'GlobalStandard'
    capacity: 50
  }
]

// More regions for capacity, each with its own Azure OpenAI account and the deployments
// above (docs/deploy.md, Two regions), e.g. ['swedencentral']; true below: only when the first is
// throttled or down, instead of an even share.
param openAiExtraRegions = []
param openAiExtraRegionsOnlyOnFailover = false

// Scale (see docs/deploy.md, Scale for a big event).
param maximumInstanceCount = 100
param instanceMemoryMB = 2048
param httpPerInstanceConcurrency = 32
param alwaysReadyInstances = 0

// Secrets and per-user values come from the environment (devtools/deploy/command.py sets them):
// the CLI can override only parameters this file sets, and a secret in an environment
// variable stays out of the process list. An empty organizer key fails the template's
// @minLength(16) check on purpose, and an empty CODE_HASH_KEY its @minLength(32): a deployment
// must never replace the key that the stored codes are hashed with.
param organizerKey = readEnvironmentVariable('ORGANIZER_KEY', '')
param codeHashKey = readEnvironmentVariable('CODE_HASH_KEY', '')
param deployerPrincipalId = readEnvironmentVariable('DEPLOYER_PRINCIPAL_ID', '')
param deployerCanCallModels = bool(readEnvironmentVariable('DEPLOYER_CAN_CALL_MODELS', 'false'))
// Organizer sign-in with Entra ID (optional; docs/deploy.md, "Organizer sign-in with Entra ID").
param organizerEntraClientId = readEnvironmentVariable('ORGANIZER_ENTRA_CLIENT_ID', '')
param organizerEntraObjectIds = readEnvironmentVariable('ORGANIZER_ENTRA_OBJECT_IDS', '')
param organizerEntraGroupIds = readEnvironmentVariable('ORGANIZER_ENTRA_GROUP_IDS', '')
param organizerEntraAdminObjectIds = readEnvironmentVariable('ORGANIZER_ENTRA_ADMIN_OBJECT_IDS', '')
param organizerEntraAdminGroupIds = readEnvironmentVariable('ORGANIZER_ENTRA_ADMIN_GROUP_IDS', '')
param organizerEntraViewerObjectIds = readEnvironmentVariable('ORGANIZER_ENTRA_VIEWER_OBJECT_IDS', '')
param organizerEntraViewerGroupIds = readEnvironmentVariable('ORGANIZER_ENTRA_VIEWER_GROUP_IDS', '')

// The event proxy in one resource group: a Python function app on Flex Consumption with a
// user-assigned identity, the storage it keeps its state in, Azure OpenAI with the model
// deployments it forwards to, and Application Insights. Identity only: no keys anywhere.
// Every identifier that comes from Azure (role ids, API versions, SKUs, model versions) is
// checked by tests/test_infra.py against tests/data/azure_sources.json, which names the
// page each value was copied from.
targetScope = 'resourceGroup'

@description('Azure region for every resource (it must offer Flex Consumption and the models below).')
param location string = resourceGroup().location

@description('Short prefix for every resource name: 2 to 9 lowercase letters and digits. Capitals are lowered and hyphens, underscores and dots dropped for the storage account, whose name allows nothing else.')
@minLength(2)
@maxLength(9)
param namePrefix string = 'evtproxy'

@description('Azure OpenAI model deployments, created one at a time: name (what events list), model, version, skuName (Standard, GlobalStandard...), capacity (thousands of tokens per minute). Set in main.bicepparam; check what a region offers with az cognitiveservices model list -l REGION.')
param modelDeployments array

@description('More regions, each with an Azure OpenAI account of its own holding the same model deployments and granting the app the same role (e.g. [\'swedencentral\']): the proxy spreads load over the accounts and fails over when one is throttled or down (docs/deploy.md, Two regions). Each region must offer the models and SKUs of modelDeployments, and differ from location.')
param openAiExtraRegions array = []

@description('true: the extra regions take requests only when the first account is throttled or failing (priority 2, spill-over); false: every account takes an even share (one priority).')
param openAiExtraRegionsOnlyOnFailover bool = false

@description('The key organizers present to the HTTP API that manages events. Never written to an output.')
@secure()
@minLength(16)
param organizerKey string

@description('The key of the stored hashes of event codes (CODE_HASH_KEY): a random secret generated on the first deployment and kept on every later one (devtools/deploy/command.py reads it back from the app); a new value makes every code unknown. Never written to an output.')
@secure()
@minLength(32)
param codeHashKey string

@description('Client id of an Entra ID app registration for organizer sign-in through App Service authentication (docs/deploy.md: Organizer sign-in with Entra ID); empty: the organizer key only.')
param organizerEntraClientId string = ''

@description('Object ids of the organizers (their own events and those shared with them) who may sign in with Entra ID, comma-separated.')
param organizerEntraObjectIds string = ''

@description('Ids of Entra ID groups whose members may sign in as organizers, comma-separated.')
param organizerEntraGroupIds string = ''

@description('Object ids of the Entra ID users who sign in as admins (everything, every event), comma-separated.')
param organizerEntraAdminObjectIds string = ''

@description('Ids of Entra ID groups whose members sign in as admins (everything, every event), comma-separated.')
param organizerEntraAdminGroupIds string = ''

@description('Object ids of the Entra ID users who sign in as viewers (read the events shared with them), comma-separated.')
param organizerEntraViewerObjectIds string = ''

@description('Ids of Entra ID groups whose members sign in as viewers (read the events shared with them), comma-separated.')
param organizerEntraViewerGroupIds string = ''

@description('Object id of the deploying user (az ad signed-in-user show --query id -o tsv), granted Storage Table Data Contributor so the organizer CLI works from a laptop; empty for none.')
param deployerPrincipalId string = ''

@description('Also grant the deploying user Cognitive Services OpenAI User, to call the models directly (the proxy and its doctor do not need it).')
param deployerCanCallModels bool = false

@description('Most instances the app scales out to (Flex Consumption accepts 40 to 1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory per instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Concurrent HTTP requests one instance takes before Flex Consumption adds another (Python defaults to 1). See docs/deploy.md, Scale for a big event.')
@minValue(1)
param httpPerInstanceConcurrency int = 32

@description('Instances kept running for the HTTP functions, no cold start; billed while set, so raise it for the event window only.')
@minValue(0)
param alwaysReadyInstances int = 0

@description('Tags for every resource.')
param tags object = {}

var suffix = uniqueString(resourceGroup().id)
var prefix = toLower(namePrefix)
// A storage account name is 3 to 24 lowercase letters and digits only.
var storagePrefix = replace(replace(replace(prefix, '-', ''), '_', ''), '.', '')
var names = {
  identity: '${prefix}-id-${suffix}'
  storage: take('${storagePrefix}st${suffix}', 24)
  openAi: '${prefix}-oai-${suffix}'
  logAnalytics: '${prefix}-log-${suffix}'
  appInsights: '${prefix}-appi-${suffix}'
  plan: '${prefix}-plan-${suffix}'
  functionApp: '${prefix}-func-${suffix}'
}

// Built-in role definition ids (Azure built-in roles reference).
var roleIds = {
  cognitiveServicesOpenAiUser: '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// The app calls the models, reads and writes the tables, keeps the Functions host's state
// and reads its deployment package in blob storage, and sends telemetry (local auth is off
// on Application Insights).
var appRoles = [
  { scope: 'openAi', roleId: roleIds.cognitiveServicesOpenAiUser }
  { scope: 'storage', roleId: roleIds.storageTableDataContributor }
  { scope: 'storage', roleId: roleIds.storageBlobDataOwner }
  { scope: 'appInsights', roleId: roleIds.monitoringMetricsPublisher }
]
// What the app and, if asked, the deployer are granted on each extra region's account.
var openAiAppRoles = filter(appRoles, role => role.scope == 'openAi')
// The organizer CLI only reads and writes the tables; calling the models directly is opt-in.
var deployerTableRoles = [
  { scope: 'storage', roleId: roleIds.storageTableDataContributor }
]
var deployerModelRoles = [
  { scope: 'openAi', roleId: roleIds.cognitiveServicesOpenAiUser }
]
var deployerRoles = deployerCanCallModels ? concat(deployerTableRoles, deployerModelRoles) : deployerTableRoles

// Settings the app would refuse at start are refused here first, naming the parameter
// (modules/checks.bicep): every resource waits for the check.
module checks 'modules/checks.bicep' = {
  name: 'checks'
  params: {
    location: location
    openAiExtraRegions: openAiExtraRegions
    organizerEntraClientId: checks.outputs.organizerEntraClientId
    organizerEntraObjectIds: organizerEntraObjectIds
    organizerEntraGroupIds: organizerEntraGroupIds
    organizerEntraAdminObjectIds: organizerEntraAdminObjectIds
    organizerEntraAdminGroupIds: organizerEntraAdminGroupIds
    organizerEntraViewerObjectIds: organizerEntraViewerObjectIds
    organizerEntraViewerGroupIds: organizerEntraViewerGroupIds
  }
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.identity
  location: location
  tags: tags
  dependsOn: [
    checks
  ]
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: names.storage
    location: location
    tags: tags
  }
  dependsOn: [
    checks
  ]
}

module openAi 'modules/openai.bicep' = {
  name: 'openai'
  params: {
    name: names.openAi
    location: location
    tags: tags
    modelDeployments: modelDeployments
  }
  dependsOn: [
    checks
  ]
}

// The same account and deployments in each extra region, named with the region.
module openAiExtra 'modules/openai.bicep' = [for (region, i) in openAiExtraRegions: {
  name: 'openai-${region}'
  params: {
    name: '${prefix}-oai-${take(region, 20)}-${suffix}'
    location: checks.outputs.openAiExtraRegions[i]
    tags: tags
    modelDeployments: modelDeployments
  }
}]

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: names.logAnalytics
    appInsightsName: names.appInsights
    location: location
    tags: tags
  }
  dependsOn: [
    checks
  ]
}

module appRoleAssignments 'modules/roles.bicep' = {
  name: 'roles-app'
  params: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    assignments: appRoles
    storageAccountName: storage.outputs.name
    openAiAccountName: openAi.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module deployerRoleAssignments 'modules/roles.bicep' = if (!empty(deployerPrincipalId)) {
  name: 'roles-deployer'
  params: {
    principalId: deployerPrincipalId
    principalType: 'User'
    assignments: deployerRoles
    storageAccountName: storage.outputs.name
    openAiAccountName: openAi.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module openAiExtraAppRoles 'modules/roles.bicep' = [for (region, i) in openAiExtraRegions: {
  name: 'roles-app-openai-${region}'
  params: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    assignments: openAiAppRoles
    storageAccountName: storage.outputs.name
    openAiAccountName: openAiExtra[i].outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}]

module openAiExtraDeployerRoles 'modules/roles.bicep' = [for (region, i) in openAiExtraRegions: if (!empty(deployerPrincipalId) && deployerCanCallModels) {
  name: 'roles-deployer-openai-${region}'
  params: {
    principalId: deployerPrincipalId
    principalType: 'User'
    assignments: deployerModelRoles
    storageAccountName: storage.outputs.name
    openAiAccountName: openAiExtra[i].outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}]

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    planName: names.plan
    appName: names.functionApp
    location: location
    tags: tags
    identityId: identity.id
    identityClientId: identity.properties.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: storage.outputs.deploymentContainerName
    tableEndpoint: storage.outputs.tableEndpoint
    appInsightsConnectionString: monitoring.outputs.connectionString
    openAiEndpoint: openAi.outputs.endpoint
    openAiBackendName: location
    openAiExtraBackends: [for (region, i) in openAiExtraRegions: {
      name: region
      endpoint: openAiExtra[i].outputs.endpoint
      priority: openAiExtraRegionsOnlyOnFailover ? 2 : 1
      weight: 1
    }]
    organizerKey: organizerKey
    codeHashKey: codeHashKey
    organizerEntraClientId: checks.outputs.organizerEntraClientId
    organizerEntraObjectIds: organizerEntraObjectIds
    organizerEntraGroupIds: organizerEntraGroupIds
    organizerEntraAdminObjectIds: organizerEntraAdminObjectIds
    organizerEntraAdminGroupIds: organizerEntraAdminGroupIds
    organizerEntraViewerObjectIds: organizerEntraViewerObjectIds
    organizerEntraViewerGroupIds: organizerEntraViewerGroupIds
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    alwaysReadyInstances: alwaysReadyInstances
  }
  // The host reaches storage and the package container with the identity from its first
  // start, so the roles go in first.
  dependsOn: [
    appRoleAssignments
    openAiExtraAppRoles
  ]
}

// Named like the settings the code reads, all used by devtools/deploy/command.py: the app's name to
// publish to, its URL and the deployments for the doctor, the endpoints for the organizer
// CLI and the summary it prints.
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = functionApp.outputs.url
output AZURE_OPENAI_ENDPOINT string = openAi.outputs.endpoint
output AZURE_OPENAI_DEPLOYMENTS array = modelDeployments
output STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint

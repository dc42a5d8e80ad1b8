// The event proxy in one resource group: a Python function app on Flex Consumption with a
// user-assigned identity, the storage it keeps its state in, Azure OpenAI with the model
// deployments it forwards to, and Application Insights. Identity only: no keys anywhere.
targetScope = 'resourceGroup'

@description('Azure region for every resource (it must offer Flex Consumption and the models below).')
param location string = resourceGroup().location

@description('Short prefix for every resource name: lowercase letters and digits.')
@minLength(2)
@maxLength(9)
param namePrefix string = 'evtproxy'

@description('Azure OpenAI model deployments, created one at a time: name, model, version, skuName, capacity (thousands of tokens per minute).')
param modelDeployments array = [
  {
    name: 'gpt-4o-mini'
    model: 'gpt-4o-mini'
    version: '2024-07-18'
    skuName: 'GlobalStandard'
    capacity: 10
  }
  {
    name: 'text-embedding-3-small'
    model: 'text-embedding-3-small'
    version: '1'
    skuName: 'Standard'
    capacity: 10
  }
]

@description('The key organizers present to the HTTP API that manages events. Never written to an output.')
@secure()
@minLength(16)
param organizerKey string

@description('Object id of the deploying user (az ad signed-in-user show --query id -o tsv), granted the data roles so the organizer CLI works from a laptop; empty for none.')
param deployerPrincipalId string = ''

@description('Tags for every resource.')
param tags object = {}

var suffix = uniqueString(resourceGroup().id)
var prefix = toLower(namePrefix)
var names = {
  identity: '${prefix}-id-${suffix}'
  storage: take('${prefix}st${suffix}', 24)
  openAi: '${prefix}-oai-${suffix}'
  logAnalytics: '${prefix}-log-${suffix}'
  appInsights: '${prefix}-appi-${suffix}'
  plan: '${prefix}-plan-${suffix}'
  functionApp: '${prefix}-func-${suffix}'
}

var roleIds = {
  cognitiveServicesOpenAiUser: '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f4cdb15b2fe'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// Data roles the app and the organizer CLI both need: call the models, read and write the
// tables, and (for the app) read its deployment package from the blob container.
var dataRoles = [
  { scope: 'openAi', roleId: roleIds.cognitiveServicesOpenAiUser }
  { scope: 'storage', roleId: roleIds.storageTableDataContributor }
  { scope: 'storage', roleId: roleIds.storageBlobDataOwner }
]
// The app also sends telemetry to Application Insights, which has local auth off.
var appRoles = concat(dataRoles, [
  { scope: 'appInsights', roleId: roleIds.monitoringMetricsPublisher }
])

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.identity
  location: location
  tags: tags
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: names.storage
    location: location
    tags: tags
  }
}

module openAi 'modules/openai.bicep' = {
  name: 'openai'
  params: {
    name: names.openAi
    location: location
    tags: tags
    modelDeployments: modelDeployments
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: names.logAnalytics
    appInsightsName: names.appInsights
    location: location
    tags: tags
  }
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
    assignments: dataRoles
    storageAccountName: storage.outputs.name
    openAiAccountName: openAi.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

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
    organizerKey: organizerKey
  }
  // The host reaches storage and the package container with the identity from its first
  // start, so the roles go in first.
  dependsOn: [
    appRoleAssignments
  ]
}

// Named like the app settings, so a deployment's outputs can be exported as they are.
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = functionApp.outputs.url
output AZURE_OPENAI_ENDPOINT string = openAi.outputs.endpoint
output STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_CLIENT_ID string = identity.properties.clientId

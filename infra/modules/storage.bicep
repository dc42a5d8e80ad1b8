// The storage account: the proxy's tables, the Functions host's own state, and the blob
// container Flex Consumption deploys the app package from. Reached only with Entra ID.
param name string
param location string
param tags object = {}

@description('Tables the proxy keeps its state in; the code uses these exact names.')
param tableNames array = [
  'proxyevents'
  'proxyusage'
  'proxyrequests'
]

@description('Blob container the app package is deployed to.')
param deploymentContainerName string = 'deployments'

resource account 'Microsoft.Storage/storageAccounts@2024-01-01' = {
  // checkov:skip=CKV_AZURE_35: Flex Consumption without VNet integration reaches its storage over the public endpoint, so the firewall must allow it; every request needs Entra ID (shared keys are off).
  // checkov:skip=CKV_AZURE_59: Same reason as CKV_AZURE_35; the organizer CLI also reaches the tables from a laptop. Anonymous blob access and shared keys are off.
  // checkov:skip=CKV_AZURE_206: Event state is short-lived; locally redundant storage is enough and geo-replication would only add cost.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    isLocalUserEnabled: false
    isSftpEnabled: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2024-01-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2024-01-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2024-01-01' = {
  parent: account
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2024-01-01' = [for tableName in tableNames: {
  parent: tableService
  name: tableName
}]

output name string = account.name
output tableEndpoint string = account.properties.primaryEndpoints.table
output deploymentContainerName string = deploymentContainer.name

// Azure OpenAI: the upstream the proxy forwards to, reached with the app's identity only.
param name string
param location string
param tags object = {}

@description('Model deployments: name, model, version, skuName (the deployment type, per deployment), capacity.')
param modelDeployments array

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  // checkov:skip=CKV_AZURE_134: The function app has no VNet integration and calls the account over its public endpoint; local auth is off, so every call needs an Entra ID token with the OpenAI User role.
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
    }
  }
}

// One at a time: Azure OpenAI rejects concurrent deployment changes on one account.
@batchSize(1)
resource deployments 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = [for deployment in modelDeployments: {
  parent: account
  name: deployment.name
  sku: {
    name: deployment.skuName
    capacity: deployment.capacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: deployment.model
      version: deployment.version
    }
  }
}]

output name string = account.name
output endpoint string = account.properties.endpoint

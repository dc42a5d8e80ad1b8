// Role assignments for one principal, each scoped to the resource it grants access to and
// named guid(resource id, principal, role) so a redeployment finds the same assignment.
// Bicep needs a typed resource as a scope, so there is one loop per kind of resource, each
// over the same list of {scope, roleId}.
param principalId string

@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param principalType string

@description('What to grant: each item is {scope: storage | openAi | appInsights, roleId: role definition GUID}.')
param assignments array

param storageAccountName string
param openAiAccountName string
param appInsightsName string

resource storage 'Microsoft.Storage/storageAccounts@2024-01-01' existing = {
  name: storageAccountName
}

resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource storageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for assignment in assignments: if (assignment.scope == 'storage') {
  name: guid(storage.id, principalId, assignment.roleId)
  scope: storage
  properties: {
    principalId: principalId
    principalType: principalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', assignment.roleId)
  }
}]

resource openAiRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for assignment in assignments: if (assignment.scope == 'openAi') {
  name: guid(openAi.id, principalId, assignment.roleId)
  scope: openAi
  properties: {
    principalId: principalId
    principalType: principalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', assignment.roleId)
  }
}]

resource appInsightsRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for assignment in assignments: if (assignment.scope == 'appInsights') {
  name: guid(appInsights.id, principalId, assignment.roleId)
  scope: appInsights
  properties: {
    principalId: principalId
    principalType: principalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', assignment.roleId)
  }
}]

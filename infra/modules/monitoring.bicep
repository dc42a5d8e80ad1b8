// Log Analytics and workspace-based Application Insights, which accepts telemetry only
// from Entra ID identities (local auth off).
param logAnalyticsName string
param appInsightsName string
param location string
param tags object = {}

@description('Days the workspace keeps logs.')
param retentionInDays int = 30

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2025-02-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
  }
}

output appInsightsName string = appInsights.name
// The connection string holds only the ingestion endpoint and instrumentation key, which is
// an identifier, not a credential, once local auth is off.
output connectionString string = appInsights.properties.ConnectionString

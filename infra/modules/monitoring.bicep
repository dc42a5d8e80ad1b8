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

// The event dashboard (requests and tokens over time by model and attendee, refusals by reason,
// upstream throttling, latency percentiles). Its queries are run by tests/test_telemetry.py on
// the telemetry the app sends (proxy/observability/otel.py).
resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(appInsights.id, 'event-proxy-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Event proxy'
    category: 'workbook'
    sourceId: appInsights.id
    serializedData: loadTextContent('../workbook.json')
  }
}

output appInsightsName string = appInsights.name
// The connection string holds only the ingestion endpoint and instrumentation key, which is
// an identifier, not a credential, once local auth is off.
output connectionString string = appInsights.properties.ConnectionString
